from __future__ import annotations

from reconciler.launch import main

if __name__ == "__main__":
    main()
