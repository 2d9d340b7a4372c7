"""shoal.raft"""
