"""`python -m pallm ...` is the `pallm` command; it is also how launchers start it:
`accelerate launch -m pallm train sft ...`, `torchrun --nproc_per_node 2 -m pallm train sft ...`."""

from pallm.cli.main import app

app()
