"""DIR's ranking training: the three-stream siamese model and its triplet
loss, hard-negative mining in rounds, the RPN stage and the trainer that
runs them (`trainer`)."""
