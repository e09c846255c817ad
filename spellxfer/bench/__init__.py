"""Speed measurements: training and evaluation beside a plain transformers reference, and a load
test of a running server, with its figures."""
