"""Push provider clients; each implements :class:`notifiers.providers.base.Provider`."""
