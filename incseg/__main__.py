from incseg.cli import app

app(prog_name="incseg")
