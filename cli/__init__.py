"""shoal.cli"""
