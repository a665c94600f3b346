"""Thin torch.nn modules over the ops: same parameters and state_dict whatever the backend."""
