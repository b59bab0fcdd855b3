"""Experiments over trained methods: the ablation runner (`ablate`, `make ablate`), its rows' layout (`rows`), the
reproduction report beside the papers' tables (`report`, `make report`) and ensembles (`ensemble`)."""
