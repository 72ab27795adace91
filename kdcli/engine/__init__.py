"""The training engine behind `kdcli distill` / `kdcli train` (`kdcli.distill.run` drives it).

devices    this process's place in a torchrun job, device, precision, seeds
recipe_facts  what --overwrite must keep, the recipe's hash, the command that resumes
loading    the tokenizer reference, the teachers and the student
setup      everything built before the first step, in order, as one `RunState`; resume
optim      AdamW parameter groups, the fused optimizer, the warm-up/decay schedule
teachers   the teachers' features (or the logit cache) and the student's step module
batches    the training batches in order, owning the epoch rollover
step       one optimizer step: micro-batches, the stop flags every rank agrees on
outputs    logging, evaluation, checkpoints and the final files
"""
