"""``python -m hypsegcli`` runs the ``hypseg`` command line."""

from hypsegcli.cli import main

if __name__ == "__main__":
    main()
