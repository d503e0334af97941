"""The thesis's experiments: k-fold cross-validation, the grid of its table 4.3, and the report.

  crossval  one config trained on every fold; its line of the table
  runs      the grid's runs (one experiments.main process per row and fold), checked and recorded
  executors a local pool of processes or a submitit job array that trains them
  report    the grid's table, a verdict on each claim, the loss-curve figures
  table     the thesis's table 4.3 as data, and a row beside it in the thesis's units
  stats     mean ± std over folds and paired tests of two rows
"""
