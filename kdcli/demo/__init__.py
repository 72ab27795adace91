"""The quickstarts: `make demo` (SST-2, sst2.py) and `make demo-lm` (SmolLM2, lm.py), with the LM
demo's figures and tables (lm_report.py), its eval curves (lm_curves.py) and what both share
about their outputs (outputs.py)."""
