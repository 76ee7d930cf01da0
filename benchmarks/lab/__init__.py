"""The lab's infrastructure, shared by every study: ``runs`` (one fine-tuning run as a keyed row, the stores),
``scheduler`` (a study's phases in a pool of workers), ``stats`` (intervals, paired tests, Holm), ``common`` (config
composition, results JSON, the provenance every row records) and ``fill_docs`` (the committed numbers into the docs)."""
