"""The specification's use cases as runnable jobs.

``examples.jobs`` defines the jobs (order fulfillment, bank transfer, subscription
payment, shipment, onboarding, refund); ``examples.services`` holds the small
business services their steps call, each writing to its own MongoDB database so
a compensation is visible in the data; ``examples.data`` seeds those databases
and sums the invariants (stock, money) that a compensation must restore.
"""
