"""Evaluation on a labelled split: methods compared (``benchmark``), report files and plots
(``report``), metrics from one confusion matrix (``metrics``).

May import ``magseg.engine``, ``magseg.data`` and ``magseg.io.atomic``.
"""
