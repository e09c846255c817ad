"""Transfer analysis of a sweep (which training patterns transfer to position and count) and its report.

``runs``: find the trial directories (from ``--runs`` or an Optuna study) and read them;
``columns``: the metric whitelist applied to every table column;
``transfer_analysis``: the per-run statistics and the ``analyze`` command; ``configs``: the seeds
of one configuration aggregated and tested across; ``effects``: correlations and hyperparameter
effects across configurations; ``tokens``: token counts with the evaluated model's tokenizer;
``figures``: matplotlib plots; ``report``: the self-contained HTML report (``report`` command).
Trained on spelling, evaluated on position and count only.
"""
