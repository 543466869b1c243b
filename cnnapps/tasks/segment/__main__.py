"""``python -m cnnapps.tasks.segment train|evaluate|predict|bench``."""
from cnnapps.tasks.cli import main

if __name__ == "__main__":
    main("segment")
