from incseg.cli import run

run()
