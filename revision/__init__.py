"""ReVision: train multimodal LLMs from unpaired images and text (see README.md and docs/design.md)."""
from revision.requirements import check_requirements

check_requirements()
