"""Server-rendered pages for staff and partners: a session cookie in place of the API key,
a CSRF token on every form, the same roles and services as the API."""
