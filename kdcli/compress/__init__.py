"""Making students smaller: pruning by measured importance and export.

Modules: `block_ranking` (angular distance, block influence, even spacing: which teacher
blocks a shallower student keeps), `blocks` (`student.init_from_teacher` by measurement: the
first training rows -> BlockRanking), `rank_blocks` (`kdcli rank-blocks`), `importance`
(Minitron activation importance per head, MLP channel and embedding channel), `prune` (the
pruned student: kept sets, sliced weights, its config),
`prune_report` (`kdcli prune`: importances and kept sets without training), `export_gguf`
(`kdcli export`: a run's student as a GGUF file). The sizes rule itself is torch-free, in
`kdcli.recipe.prune_schema`.
"""
