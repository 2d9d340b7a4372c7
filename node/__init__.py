"""shoal.node"""
