"""Worked examples that embed Guildcast (``guildcast.examples.kanban``)."""
