"""spellxfer's shipped configs, installed as the package ``spellxfer.configs`` (package data).

Code finds them through ``importlib.resources`` (``spellxfer.core.configs``), never relative to a
checkout, so an installed wheel has the same files: ``--config configs/tiny.yaml`` given where no
such file exists reads the shipped one. Trained on spelling, evaluated on position and count only.
"""
