"""The quickstarts: `make demo` (SST-2, sst2.py) and `make demo-lm` (SmolLM2, lm.py), with the LM
demo's figures and tables (lm_report.py) and its eval curves (plots.py)."""
