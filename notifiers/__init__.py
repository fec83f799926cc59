"""notifiers: the chatmail push proxy (``/notify`` -> APNs, FCM, UBports, Web Push)."""

__version__ = "0.1.0"
