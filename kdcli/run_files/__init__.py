"""What a run writes and reads back: the output folder (marker, lock, what --overwrite may
clear: `outdir`), files written whole or not at all (`atomic_files`), resumable checkpoints
(`checkpoint`, torch) and their layout on disk (`checkpoint_layout`, torch-free), and a run
folder read back (`run_metrics`: metrics.jsonl, summary.json; torch-free)."""
