"""What each `tunery` command does, grouped by what it works on; `tunery/cli.py` holds the table of them.

A command is a plain function of its parsed arguments returning the exit status, with a function beside it
adding its flags. Nothing heavy is imported at the top of these modules (train.py reads the torch-free
configs): torch, transformers and the service load inside the commands that need them, so `tunery --help`
and the cheap refusals stay instant.

    data.py      data validate | screen | augment | convert
    train.py     train sft | rm | dpo | kto | grpo | ppo (flags generated from the method's config)
    models.py    models, chat, generate, compare, score, export
    evals.py     eval compare | safety | bias | ... | all, card
    graders.py   graders validate | run
    service.py   serve, keys create | list | revoke
    audit.py     audit verify | export | head
"""
