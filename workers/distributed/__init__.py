"""Celery at the edge: every module that imports celery, kombu or redis lives here.

The rest of the archiver (the steps, the embedded runner, the CLI) never imports this
package's Celery modules. Importing the package itself, `names` or `routing` loads none of
those libraries: beat's schedule uses `names`, and the settings check `CCARCHIVE_ROUTES`
with `routing`.
"""
