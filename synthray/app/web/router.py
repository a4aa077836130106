"""The pages under /ui: sign-in, the reviewer's queue and export page, the operator's
datasets, models, jobs and batches, the partner's own exports, the admin's keys and audit
trail.

Pages call the same services as the API with the same roles. A page answers a signed-out
browser with a redirect to sign-in, a role that may not see it with 403, and something
missing, or another partner's, with the same 404 page. Every form carries the session's
CSRF token; a form without it changes nothing (403).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, unquote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ValidationError

from synthray.app.audit import service as audit
from synthray.app.audit.schemas import AuditFilter
from synthray.app.auth import oidc
from synthray.app.auth import service as auth
from synthray.app.auth.oidc import TokenRefused
from synthray.app.auth.schemas import KeyCreate, Role
from synthray.app.batches import service as batches
from synthray.app.batches.schemas import CHOSEN_BY, SynthesizeRequest
from synthray.app.datasets import service as datasets
from synthray.app.deps import (
    BlobsDep,
    SessionDep,
    SettingsDep,
    blocking,
    off_loop,
    refuse_route,
    writes_on_read,
)
from synthray.app.errors import Forbidden, Invalid, NotFound
from synthray.app.exports import service as exports
from synthray.app.exports.schemas import ExportCreate, ExportState
from synthray.app.fields import JobIdParam, RowId
from synthray.app.jobs import control
from synthray.app.jobs import service as jobs
from synthray.app.registry import service as registry
from synthray.app.registry.summary import audit_line, planted_line, quality_lines
from synthray.app.web import evidence, provider
from synthray.app.web import service as web
from synthray.app.web.service import Browser
from synthray.config import Settings

M = TypeVar("M", bound=BaseModel)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def _size(n: int | None) -> str:
    """Bytes for people: '812 kB', '145.2 MB'."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


templates.env.filters["size"] = _size
router = APIRouter(prefix="/ui", include_in_schema=False)

STAFF = (Role.operator, Role.reviewer, Role.admin)
LANDING = {
    Role.admin: "/ui/exports",
    Role.reviewer: "/ui/exports",
    Role.operator: "/ui/jobs",
    Role.partner: "/ui/exports",
}
# Pages show real training images to staff: nothing may be kept, framed or sent onwards.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


class SignInFirst(Exception):
    """A page was asked for without a valid session: answered by a redirect to sign-in."""

    def __init__(self, path: str) -> None:
        self.path = path


def page(
    request: Request,
    name: str,
    who: Browser | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        name,
        {"who": who.principal if who else None, "csrf": who.csrf if who else "", **context},
        status_code=status_code,
        headers=HEADERS,
    )
    return response


def error_page(request: Request, status_code: int, detail: str) -> HTMLResponse:
    """The HTML answer to a refused or failed page request (the API answers JSON), with the
    navigation when the request came from a signed-in browser."""
    who = getattr(request.state, "browser", None)
    return page(request, "error.html", who, status_code, status=status_code, detail=detail)


def signed_in(*roles: Role) -> Callable[..., Awaitable[Browser]]:
    allowed = set(roles) | {Role.admin}

    async def check(request: Request, session: SessionDep, settings: SettingsDep) -> Browser:
        token = request.cookies.get(_cookie(request, settings, web.COOKIE))
        who = await blocking(session, web.browser, session, settings, token)
        if who is None:
            raise SignInFirst(request.url.path)
        request.state.browser = who  # for an error page answering this request
        if who.principal.role not in allowed:
            reason = f"role {who.principal.role} lacks the right"
            await off_loop(session, refuse_route, request, session, who.principal, reason)
            raise Forbidden("your role may not open this page")
        return who

    return check


async def _form_token(request: Request) -> str | None:
    form = await request.form()
    token = form.get("csrf")
    return token if isinstance(token, str) else None


def posted(*roles: Role) -> Callable[..., Awaitable[Browser]]:
    """A signed-in browser of one of ``roles`` whose form carries its CSRF token."""
    check_role = signed_in(*roles)

    async def check(request: Request, session: SessionDep, settings: SettingsDep) -> Browser:
        who = await check_role(request, session, settings)
        if not web.same_token(who.csrf, await _form_token(request)):
            raise Forbidden("this form has expired or did not come from this site; reload it")
        return who

    return check


AnyPage = Annotated[Browser, Depends(signed_in(*Role))]
StaffPage = Annotated[Browser, Depends(signed_in(*STAFF))]
OperatorPage = Annotated[Browser, Depends(signed_in(Role.operator))]
ReviewerPage = Annotated[Browser, Depends(signed_in(Role.reviewer))]
AdminPage = Annotated[Browser, Depends(signed_in(Role.admin))]
AnyForm = Annotated[Browser, Depends(posted(*Role))]
OperatorForm = Annotated[Browser, Depends(posted(Role.operator))]
ReviewerForm = Annotated[Browser, Depends(posted(Role.reviewer))]
AdminForm = Annotated[Browser, Depends(posted(Role.admin))]


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


def _cookie_secure(request: Request, settings: Settings) -> bool:
    return web.secure_cookies(request.url.scheme, settings)


def _cookie(request: Request, settings: Settings, base: str) -> str:
    """The name this request's cookie ``base`` goes by (``__Host-`` over HTTPS)."""
    return web.cookie_name(base, _cookie_secure(request, settings))


def _whole(text: str) -> int | str:
    """A form's number field as the JSON API takes it: an int where the text is a whole
    number (a browser sends every field as text, and the request schemas take JSON numbers
    only), else the text itself, which the schema then refuses naming the field."""
    t = text.strip()
    return int(t) if re.fullmatch(r"-?[0-9]{1,30}", t) else text


def _form(model: type[M], fields: dict[str, Any]) -> M:
    """Form fields validated by the API's own request schema; a 422 page naming the first
    bad field otherwise."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "form"
        raise Invalid(f"{where}: {e['msg']}") from None


# ----------------------------------------------------------------------------- sign-in


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    who = web.browser(
        session, settings, request.cookies.get(_cookie(request, settings, web.COOKIE))
    )
    if who is None:
        return _see_other("/ui/signin")
    return _see_other(LANDING[who.principal.role])


@router.get("/signin", response_class=HTMLResponse, name="signin_form")
def signin_form(request: Request, settings: SettingsDep, next: str = "") -> HTMLResponse:
    return _signin_page(request, settings, 200, None, next[:200])


def _safe_next(target: str) -> str | None:
    """Where to go after signing in: a page of this site only (never another host)."""
    ok = target.startswith("/ui/") and not target.startswith("//") and "\\" not in target
    return target if ok and target.isprintable() and len(target) < 200 else None


def _signin_page(
    request: Request, settings: Settings, status_code: int, error: str | None, next_page: str
) -> HTMLResponse:
    token = web.new_form_token()
    response = page(
        request,
        "signin.html",
        None,
        status_code,
        signin_token=token,
        error=error,
        next_page=_safe_next(next_page) or "",
        provider=provider.enabled(settings),
    )
    response.set_cookie(
        _cookie(request, settings, web.SIGNIN_COOKIE),
        token,
        max_age=600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request, settings),
    )
    return response


@router.post("/signin", response_class=HTMLResponse)
def signin(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=200)] = "",
    csrf: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    signin_cookie = _cookie(request, settings, web.SIGNIN_COOKIE)
    if not web.same_token(request.cookies.get(signin_cookie), csrf):
        error = "The sign-in form had expired; it has been renewed, please try again."
        return _signin_page(request, settings, 403, error, next)
    signed = web.sign_in(session, settings, key)
    if signed is None:
        return _signin_page(request, settings, 401, "That key is not valid.", next)
    token, who = signed
    response = _see_other(_safe_next(next) or LANDING[who.principal.role])
    _set_session_cookie(response, request, settings, token)
    _delete_cookie(response, request, settings, signin_cookie)
    return response


def _set_session_cookie(
    response: Response, request: Request, settings: Settings, token: str
) -> None:
    response.set_cookie(
        _cookie(request, settings, web.COOKIE),
        token,
        max_age=int(settings.web_session_hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request, settings),
    )


def _delete_cookie(response: Response, request: Request, settings: Settings, name: str) -> None:
    # A browser drops a __Host- cookie only when the deletion is itself Secure.
    response.delete_cookie(
        name, path="/", httponly=True, secure=_cookie_secure(request, settings), samesite="lax"
    )


def _callback_url(request: Request, settings: Settings) -> str:
    return settings.oidc_redirect_url or str(request.url_for("provider_callback"))


@router.get("/signin/provider")
def provider_signin(request: Request, settings: SettingsDep, next: str = "") -> Response:
    """Off to the identity provider's sign-in, with this browser's flow cookie."""
    if not provider.enabled(settings):
        raise NotFound("sign-in through an identity provider is not configured here")
    seed = provider.new_seed()
    try:
        target = provider.authorization_url(settings, seed, _callback_url(request, settings))
    except provider.ProviderUnavailable:
        error = "The identity provider cannot be reached just now; try again shortly."
        return _signin_page(request, settings, 503, error, next)
    response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    # Lax, not Strict: the browser must send it on the provider's redirect back (a
    # top-level GET from another site). The next page rides along in the same cookie.
    response.set_cookie(
        _cookie(request, settings, provider.COOKIE),
        seed + "|" + quote(_safe_next(next) or "", safe="/"),
        max_age=provider.FLOW_SECONDS,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_cookie_secure(request, settings),
    )
    return response


@router.get("/signin/provider/callback", name="provider_callback")
@writes_on_read
def provider_callback(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    code: Annotated[str, Query(max_length=4096)] = "",  # some providers issue 1-2 kB codes
    state: Annotated[str, Query(max_length=200)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    """The provider's answer: a browser session for the person it names, or the sign-in
    page with the reason (the provider's own error text is not shown: it is not ours)."""
    if not provider.enabled(settings):
        raise NotFound("sign-in through an identity provider is not configured here")
    flow_cookie = _cookie(request, settings, provider.COOKIE)
    seed, _, next_page = request.cookies.get(flow_cookie, "").partition("|")
    next_page = unquote(next_page)
    reason: str | None = None
    status_code = 401
    if error or not code or not state:
        reason = "the identity provider did not sign this person in"
    else:
        try:
            principal = provider.complete(
                session, settings, seed, state, code, _callback_url(request, settings)
            )
        except TokenRefused as refused:
            reason = refused.reason
            status_code = 403 if refused.forbidden else 401
        except provider.ProviderUnavailable:
            reason = "the identity provider could not be reached"
            status_code = 503
    if reason is not None:
        audit.record_refusal(session, None, "sign_in", "web_session", None, reason[:200])
        response = _signin_page(
            request,
            settings,
            status_code,
            f"Sign-in through the identity provider failed: {reason}.",
            next_page,
        )
        _delete_cookie(response, request, settings, flow_cookie)
        return response
    token, who = web.open_session(session, settings, principal)
    # A page that moves on by itself rather than a redirect: the navigation that brought
    # the browser here began at the provider (another site), and a browser does not send
    # the SameSite=Strict session cookie on a redirect of that navigation.
    landing = _safe_next(next_page) or LANDING[who.principal.role]
    response = page(request, "signed_in.html", who, 200, landing=landing)
    _set_session_cookie(response, request, settings, token)
    _delete_cookie(response, request, settings, flow_cookie)
    return response


@router.post("/signout")
def signout(request: Request, session: SessionDep, settings: SettingsDep, who: AnyForm) -> Response:
    """End the session here; a person who signed in at the identity provider is sent on to
    its sign-out, so the browser is not signed straight back in."""
    session_cookie = _cookie(request, settings, web.COOKIE)
    web.sign_out(session, settings, request.cookies.get(session_cookie))
    target = "/ui/signin"
    if provider.enabled(settings) and who.principal.name.startswith(oidc.IDENTITY_PREFIX):
        back = settings.oidc_post_logout_redirect_url or str(request.url_for("signin_form"))
        target = provider.logout_url(settings, back) or target
    response = _see_other(target)
    _delete_cookie(response, request, settings, session_cookie)
    return response


# ----------------------------------------------------------------------------- exports


@router.get("/exports", response_class=HTMLResponse)
def export_list(request: Request, session: SessionDep, who: AnyPage) -> HTMLResponse:
    rows = exports.list_exports(session, who.principal, limit=200)
    waiting = [e for e in rows if e.state == ExportState.awaiting_approval]
    others = [e for e in rows if e.state != ExportState.awaiting_approval]
    return page(request, "exports.html", who, waiting=waiting, others=others)


@router.get("/exports/{export_id}", response_class=HTMLResponse)
@writes_on_read
def export_page(
    export_id: RowId, request: Request, session: SessionDep, blobs: BlobsDep, who: AnyPage
) -> HTMLResponse:
    e = exports.get(session, export_id, who.principal)
    shown = exports.read(e, who.principal)
    if who.principal.role == Role.partner:
        texts = exports.bundle_texts(blobs, e)
        return page(request, "export_partner.html", who, e=shown, texts=texts)
    proof = None
    if e.state in (ExportState.awaiting_approval, ExportState.approved, ExportState.rejected):
        proof = evidence.for_export(session, blobs, e)
        audit.record(session, who.principal, "view_evidence", "export", e.id, "ok")
    can_review = (
        who.principal.role in (Role.reviewer, Role.admin)
        and e.state == ExportState.awaiting_approval
        and all(r.reviewer_key_id != who.principal.key_id for r in shown.reviews)
    )
    own = e.requested_by == who.principal.key_id
    return page(
        request, "export_staff.html", who, e=shown, proof=proof, can_review=can_review, own=own
    )


@router.post("/exports/{export_id}/approve")
def approve(
    export_id: RowId,
    session: SessionDep,
    settings: SettingsDep,
    who: ReviewerForm,
    comment: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if not comment.strip():
        raise Invalid("an approval needs a comment: what you looked at", field="comment")
    exports.approve(session, settings, export_id, who.principal, comment.strip())
    return _see_other(f"/ui/exports/{export_id}")


@router.post("/exports/{export_id}/reject")
def reject(
    export_id: RowId,
    session: SessionDep,
    who: ReviewerForm,
    comment: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if not comment.strip():
        raise Invalid("a rejection needs a comment: why the export is refused", field="comment")
    exports.reject(session, export_id, who.principal, comment.strip())
    return _see_other(f"/ui/exports/{export_id}")


@router.post("/exports")
def request_export(
    session: SessionDep,
    settings: SettingsDep,
    who: OperatorForm,
    batch_id: Annotated[str, Form(max_length=20)] = "",
    partner: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    body = _form(ExportCreate, {"batch_id": _whole(batch_id), "partner": partner})
    accepted = exports.request_export(session, settings, body, who.principal)
    return _see_other(f"/ui/exports/{accepted.export_id}")


# ------------------------------------------------------------------- operator pages


@router.get("/datasets", response_class=HTMLResponse)
def dataset_list(request: Request, session: SessionDep, who: StaffPage) -> HTMLResponse:
    return page(request, "datasets.html", who, datasets=datasets.list_datasets(session))


@router.get("/models", response_class=HTMLResponse)
def model_list(request: Request, session: SessionDep, who: StaffPage) -> HTMLResponse:
    return page(request, "models.html", who, models=registry.list_models(session))


@router.get("/models/{name}", response_class=HTMLResponse)
def model_page(name: str, request: Request, session: SessionDep, who: StaffPage) -> HTMLResponse:
    m = registry.get_model(session, name[:100])
    versions = [
        {
            "v": v,
            "quality": quality_lines(v.metrics.get("quality") or {}),
            "privacy": audit_line(v.metrics.get("privacy_audit")),
            "planted": planted_line(v.metrics.get("privacy_audit")),
            "gallery": bool((v.metrics.get("quality") or {}).get("gallery_sha256")),
        }
        for v in sorted(m.versions, key=lambda v: -v.version)
    ]
    history = registry.alias_history(session, m.name)
    return page(request, "model.html", who, m=m, versions=versions, history=history)


@router.get("/jobs", response_class=HTMLResponse)
def job_list(request: Request, session: SessionDep, who: StaffPage) -> HTMLResponse:
    return page(request, "jobs.html", who, jobs=jobs.list_jobs(session, 50))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: JobIdParam, session: SessionDep, who: OperatorForm) -> Response:
    control.cancel(session, job_id)
    return _see_other("/ui/jobs")


@router.post("/jobs/{job_id}/retry")
def retry_job(
    job_id: JobIdParam, session: SessionDep, settings: SettingsDep, who: OperatorForm
) -> Response:
    control.retry(session, settings, job_id, who.principal)
    return _see_other("/ui/jobs")


@router.get("/batches", response_class=HTMLResponse)
def batch_list(
    request: Request, session: SessionDep, settings: SettingsDep, who: StaffPage
) -> HTMLResponse:
    models = registry.list_models(session)
    return page(
        request,
        "batches.html",
        who,
        batches=batches.list_batches(session, 50),
        models=models,
        oversample=f"{settings.synthesis_oversample:g}",
        chosen_by=CHOSEN_BY,
        choice=settings.synthesis_choice,
    )


@router.post("/synthesize")
def synthesize(
    session: SessionDep,
    settings: SettingsDep,
    who: OperatorForm,
    model: Annotated[str, Form(max_length=100)] = "",
    per_class: Annotated[str, Form(max_length=10)] = "",
    seed: Annotated[str, Form(max_length=20)] = "0",
) -> Response:
    body = _form(
        SynthesizeRequest,
        {
            "model": model,
            "per_class": _whole(per_class) if per_class else None,
            "seed": _whole(seed or "0"),
        },
    )
    batches.request_synthesis(session, settings, body, who.principal.key_id)
    return _see_other("/ui/jobs")


# ---------------------------------------------------------------------- admin pages


@router.get("/keys", response_class=HTMLResponse)
def key_list(request: Request, session: SessionDep, who: AdminPage) -> HTMLResponse:
    return page(request, "keys.html", who, keys=auth.list_keys(session), created=None)


@router.post("/keys", response_class=HTMLResponse)
def create_key(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: AdminForm,
    name: Annotated[str, Form(max_length=100)] = "",
    role: Annotated[str, Form(max_length=20)] = "",
    same_partner: Annotated[str, Form(max_length=5)] = "",
) -> HTMLResponse:
    body = _form(KeyCreate, {"name": name, "role": role, "same_partner": same_partner == "yes"})
    created = auth.create_key(
        session, settings.secret_key, body.name, body.role, same_partner=body.same_partner
    )
    detail = {"role": body.role, "same_partner": body.same_partner}
    audit.record(session, who.principal, "create_key", "api_key", created.id, "ok", detail)
    # Shown once, on this answer only (no-store), never in a URL.
    return page(request, "keys.html", who, keys=auth.list_keys(session), created=created)


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: RowId, session: SessionDep, who: AdminForm) -> Response:
    auth.revoke_key(session, key_id)
    audit.record(session, who.principal, "revoke_key", "api_key", key_id, "ok")
    return _see_other("/ui/keys")


@router.get("/audit", response_class=HTMLResponse)
def audit_trail(
    request: Request,
    session: SessionDep,
    who: ReviewerPage,
    action: str = "",
    actor: str = "",
    object_type: str = "",
    object_id: str = "",
    outcome: str = "",
) -> HTMLResponse:
    where = AuditFilter(
        object_type=object_type[:40] or None,
        action=action[:40] or None,
        actor=actor[:100] or None,
        outcome=outcome[:20] or None,
        object_id=object_id[:64] or None,
    )
    events = audit.list_events(session, 200, where)
    return page(request, "audit.html", who, events=events, where=where)


# Last of the pages: an unknown page is a 404 page with the navigation for a signed-in
# browser, and a sign-in first for anyone else.
@router.get("/{rest:path}", response_class=HTMLResponse)
def no_such_page(rest: str, who: Annotated[Browser, Depends(signed_in(*Role))]) -> None:
    raise NotFound("there is no such page")


def install(app: Any) -> None:
    """Mount the pages, their static files, and HTML answers for errors under /ui."""
    from fastapi.staticfiles import StaticFiles

    # The static files first: the pages end with a catch-all for unknown pages.
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)
    app.state.error_page = error_page

    @app.exception_handler(SignInFirst)
    async def _sign_in_first(_req: Request, exc: SignInFirst) -> Response:
        return _see_other("/ui/signin?next=" + quote(exc.path, safe="/"))
