"""Evaluating trained runs: capacity sweeps, reports, figures, ablations, few-shot, the ledger."""
