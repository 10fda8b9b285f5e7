"""Embed unpaired images and texts with a CLIP-style encoder (see revision/embed.py for the input formats).

    python image_embed.py --images IMAGES_DIR --texts captions.txt --encoder hf:openai/clip-vit-large-patch14-336 --out embeds/
"""
from revision.embed import main

if __name__ == "__main__":
    raise SystemExit(main())
