"""The commands beside `train`: eval, score, doctor, bench (and bench learn), ab and its report, stats.

Each module is one command's body; `argtypes` range-checks flags where they are parsed; `stats` is
the one statistics module (t-intervals, paired t, McNemar, paired bootstrap). May import every floor;
only `cli` imports it.
"""
