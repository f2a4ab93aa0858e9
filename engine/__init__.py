"""SCRUB machine unlearning: teacher-student unlearning with measurements that prove it.

Layout: ``methods/`` (the algorithms, pure tensor maths), ``backends/`` (where and how tensors are
computed and stepped), ``loop.py`` (the one training loop), ``data/`` and ``models/`` (what goes in),
``eval/`` (what comes out), ``recipes/`` (commands glued from the above), ``cli.py``.
"""

__version__ = "0.1.0"
