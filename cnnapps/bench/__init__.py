"""Benchmarks that write results/: task runs (``run``), floors and summaries (``results``), speed side by side
(``speed``), deployment runtimes (``deploy``) and model soups (``soup``)."""
