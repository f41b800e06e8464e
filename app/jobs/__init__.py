"""Asynchronous jobs for long files and signed webhooks.

* ``targets``: the webhook targets of ``EMOTION_WEBHOOKS`` (the only URLs the server ever posts to);
* ``store``: durable job and delivery records (one SQLite file per server, under the data directory);
* ``runner``: a bounded worker that runs queued jobs through ``EmotionService`` and appends each
  analysed utterance to the job's session as it goes;
* ``webhooks``: HMAC-SHA256 signed delivery with retries and exponential backoff; ``enqueue``;
* ``lifecycle``: ``start_jobs(app)`` / ``Jobs.stop()``, called from the app's lifespan.

This package's ``__init__`` imports nothing: ``app.settings`` imports ``app.jobs.targets``.
"""
