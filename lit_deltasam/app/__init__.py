"""The application layer behind ``train.py``: config schemas, assembly from a config, reports."""
