"""Probes of cost and behaviour (step time, memory, GPU checks, communication, run size, staleness), apart from the
studies: they write docs/results JSON but fine-tune no study rows."""
