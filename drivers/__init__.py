"""Southbound protocol adapters. They speak to devices and know nothing of the twin."""
