"""Training data: synthetic scenes, stage-1 webdataset shards, stage-2 cc_sbu_align, labels."""
