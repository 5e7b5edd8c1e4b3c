"""A Redis job queue that knows nothing of its jobs: bytes + options in, bytes + metadata out.

:mod:`jobqueue.keys` (Redis names, :class:`JobState`), :mod:`jobqueue.scripts` (the Lua state
machine), :mod:`jobqueue.queue` (:class:`JobQueue`, :class:`JobRecord`), :mod:`jobqueue.consumer`
(:class:`JobConsumer`: the loop that runs a :data:`Processor`), :mod:`jobqueue.metrics`
(Prometheus). It imports neither ``service`` nor ``model``: the service plugs in its processor
(``service/jobs/processor.py``) and its HTTP routes (``service/routes/jobs.py``). A processor
gives up on a job by raising :class:`PermanentJobError`; any other exception asks for a retry.
"""
