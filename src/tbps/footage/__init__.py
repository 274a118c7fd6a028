"""Camera footage: synthetic scenes (``scenes``), person detectors (``detect``), frames and videos
turned into indexed person crops with camera, time and box (``ingest``), and the end-to-end measure
(``evaluate``)."""
