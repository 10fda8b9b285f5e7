"""Answer questions about images with a trained checkpoint (see revision/predict.py for the flags)."""
import sys

from revision.predict import main

if __name__ == "__main__":
    sys.exit(main())
