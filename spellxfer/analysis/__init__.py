"""Transfer analysis of a sweep (which training patterns transfer to position and count) and its report.

``runs``: find the trial directories (from ``--runs`` or an Optuna study) and read them;
``columns``: the metric whitelist applied to every table column;
``transfer_analysis``: the statistics and the ``analyze`` command; ``figures``: matplotlib plots;
``report``: the self-contained HTML report (``report`` command).
Trained on spelling, evaluated on position and count only.
"""
