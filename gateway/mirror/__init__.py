"""The reference cloud consumer (`opstwin mirror`): each gateway's twin rebuilt from MQTT.

`state.py` is the pure state machine (births, diffs, gaps, rebirth requests); `client.py` runs it
on a paho-mqtt connection driven from asyncio (`Mirror`); `cli.py` is the command.
"""
