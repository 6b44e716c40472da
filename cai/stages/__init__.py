"""The stages: plain functions over records (revise, pairs, judge, naive judge, preferences), and the one
runner that moves rows through them (``runner.run_stage``)."""
