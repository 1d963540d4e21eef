"""``python -m dslab.shortener``: run the shortener; see ``serve.py``."""

from dslab.shortener.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
