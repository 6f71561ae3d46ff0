"""The dashboard: HTML pages over the figures the JSON endpoints serve, for operators and tenants.

``DashboardController`` (``controller.py``) serves ``/dashboard``: a login form that takes an API key
once and sets a signed session cookie (``session.py``), then per tenant the cache's savings, each
classifier's traffic, drift, canary, alerts, retrains and shadow, and each experiment's lift and
recommendation; the admin key also gets the fleet. Figures come from the same objects as
``/stats``, ``/classifiers/{name}/monitor``, ``/classifiers/{name}/shadow`` and
``/experiments/{id}`` (``data.py``); charts are SVG drawn on the server by matplotlib
(``charts.py``, which says why); templates and the one stylesheet ship inside this package.
"""

from headfleet.service.dashboard.controller import DashboardController

__all__ = ["DashboardController"]
