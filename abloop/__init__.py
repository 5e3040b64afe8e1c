"""The application's entry points: the `abloop` command, the demo and its simulated users, reports.

Nothing imports this package; it imports whatever it needs.
"""
