"""The embedded default world: procedural scenes, template captions and QA (`world`), and a CLIP trained on them (`clip`)."""
