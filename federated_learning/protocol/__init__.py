"""The wire contract shared by services and agents: messages, key names, tensor codec."""
