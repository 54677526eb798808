"""
C{python -m natkeep}: the C{natkeep} command.
"""

from natkeep.cli import console

if __name__ == "__main__":
    console()
