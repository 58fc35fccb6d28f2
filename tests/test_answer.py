"""Answer parsing: the accepted format, every repair, every failure, and fuzzing."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from star_edge.answer import MAX_OBJECTS, Answer, AnswerObject, ParseError, parse, parse_safely
from star_edge.errors import InvalidInputError, StarEdgeError

IMAGE = (1000, 500)  # W, H: x scales by 1000/840, y by 500/840


def wrap(answer: str, think: str = "the knife on the left") -> str:
    return f"<think> {think} </think>\n<answer>{answer}</answer>"


def obj(box: list, point: list, label: object = "knife") -> dict:
    return {"bbox_2d": box, "point_2d": point, "label": label}


def reference_to_original(v: float, side: int, frame_side: int) -> int:
    """The StAR reference, written out: int(v * (side / frame_side) + 0.5)."""
    return int(v * (side / frame_side) + 0.5)


def expect_failure(text: object, reason: str, image_size: tuple[int, int] = IMAGE) -> ParseError:
    with pytest.raises(ParseError) as caught:
        parse(text, image_size)
    assert caught.value.reason == reason, str(caught.value)
    return caught.value


# --- the accepted format ------------------------------------------------------------------------


def test_parse_maps_to_original_pixels_with_reference_rounding() -> None:
    text = wrap(json.dumps([obj([42, 84, 420, 839], [100, 200])]))
    answer = parse(text, IMAGE)
    # x: 42 * 1000/840 = 50.0, 420 -> 500.0, 100 -> 119.05; y: 84 * 500/840 = 50.0,
    # 839 -> 499.40, 200 -> 119.05
    assert answer.objects == [AnswerObject(box=(50, 50, 500, 499), point=(119, 119), label="knife")]
    assert answer.thinking == "the knife on the left"
    assert answer.raw == text
    assert answer.repaired is False


def test_parse_reads_several_objects_in_order() -> None:
    text = wrap(json.dumps([obj([0, 0, 84, 84], [42, 42], "cup"), obj([420, 420, 840, 840],
                                                                      [630, 630], "plate")]))
    answer = parse(text, (840, 840))
    assert answer.labels == ["cup", "plate"]
    assert answer.boxes.tolist() == [[0, 0, 84, 84], [420, 420, 839, 839]]
    assert answer.points.tolist() == [[42, 42], [630, 630]]
    assert answer.boxes.dtype == np.int64 and answer.points.dtype == np.int64


def test_parse_honours_the_input_size() -> None:
    text = wrap(json.dumps([obj([0, 0, 112, 56], [56, 28])]))
    answer = parse(text, (640, 480), input_size=(224, 112))
    assert answer.objects[0].box == (0, 0, 320, 240)
    assert answer.objects[0].point == (160, 120)


def test_parse_grid1000_frame() -> None:
    text = wrap(json.dumps([obj([100, 250, 500, 999], [500, 500])]))
    answer = parse(text, (640, 480), frame="grid1000")
    # x: v * 0.64, y: v * 0.48; 999 * 0.48 = 479.52 -> 480 -> clamped to 479
    assert answer.objects[0].box == (64, 120, 320, 479)
    assert answer.objects[0].point == (320, 240)


def test_parse_grid1000_ignores_input_size() -> None:
    text = wrap(json.dumps([obj([100, 100, 500, 500], [300, 300])]))
    assert parse(text, (640, 480), (840, 840), "grid1000") == parse(text, (640, 480), (7, 9),
                                                                    "grid1000")


def test_rounding_uses_the_factor_first_like_the_reference() -> None:
    # 420 * (27 / 840) = 13.499999999999998 -> 13, where (420 * 27) / 840 + 0.5 would give 14.
    text = wrap(json.dumps([obj([0, 0, 420, 420], [1, 1])]))
    assert parse(text, (27, 27)).objects[0].box == (0, 0, 13, 13)


@pytest.mark.parametrize(
    "answer",
    [
        '[]',
        ' [ ] ',
        '[{}]',
        '{}',
        '[{}, {}]',
        '\n  [ {} ]\n',
    ],
)
def test_no_target_answers_are_valid_and_empty(answer: str) -> None:
    parsed = parse(wrap(answer), IMAGE)
    assert parsed.objects == []
    assert parsed.boxes.shape == (0, 4) and parsed.points.shape == (0, 2)
    assert parsed.labels == []


def test_whitespace_and_text_after_the_answer_are_tolerated() -> None:
    text = "  <think>\nhmm\n</think>\n\n<answer>\n  [ {\"bbox_2d\" : [ 42 , 84 , 420 , 839 ] ,\n" \
           "\"point_2d\":[100,200], \"label\":\"knife\"} ]  \n</answer>\nDone. <answer>[]</answer>"
    answer = parse(text, IMAGE)
    assert answer.objects == [AnswerObject((50, 50, 500, 499), (119, 119), "knife")]
    assert answer.thinking == "hmm"


@pytest.mark.parametrize(
    ("box", "point"),
    [
        (["42", "84", "420", "839"], ["100", "200"]),
        ([" 42 ", "84.0", "4.2e2", "839"], ["+100", "200."]),
        ([42.0, 84.2, 420.4, 838.9], [100.3, 199.9]),
    ],
)
def test_quoted_numbers_and_floats_are_read(box: list, point: list) -> None:
    answer = parse(wrap(json.dumps([obj(box, point)])), IMAGE)
    assert answer.objects[0].box == (50, 50, 500, 499)
    assert answer.objects[0].point == (119, 119)


def test_float_coordinates_use_the_reference_rounding() -> None:
    answer = parse(wrap(json.dumps([obj([10.4, 10.4, 500.6, 500.6], [300.5, 300.5])])), IMAGE)
    expected_x = [reference_to_original(v, 1000, 840) for v in (10.4, 500.6, 300.5)]
    expected_y = [reference_to_original(v, 500, 840) for v in (10.4, 500.6, 300.5)]
    assert answer.objects[0].box == (expected_x[0], expected_y[0], expected_x[1], expected_y[1])
    assert answer.objects[0].point == (expected_x[2], expected_y[2])


def test_a_single_object_not_in_a_list_is_accepted() -> None:
    answer = parse(wrap(json.dumps(obj([42, 84, 420, 839], [100, 200]))), IMAGE)
    assert len(answer.objects) == 1 and answer.objects[0].box == (50, 50, 500, 499)


def test_think_block_is_optional() -> None:
    answer = parse('<answer>[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1]}]</answer>', IMAGE)
    assert answer.thinking == ""
    assert len(answer.objects) == 1


def test_answer_tags_inside_the_reasoning_are_not_the_answer() -> None:
    text = ("<think>I must write <answer>[...]</answer> at the end</think>"
            '<answer>[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1], "label": "a"}]</answer>')
    assert parse(text, IMAGE).labels == ["a"]


def test_answer_after_a_bare_closing_think_tag() -> None:
    text = ('the reasoning, opened by the prompt </think><answer>[{"bbox_2d": [0, 0, 84, 84], '
            '"point_2d": [1, 1], "label": "a"}]</answer>')
    answer = parse(text, IMAGE)
    assert answer.labels == ["a"] and answer.thinking == ""


def test_missing_label_defaults_to_empty_string() -> None:
    answer = parse(wrap('[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1]}]'), IMAGE)
    assert answer.labels == [""]


def test_label_whitespace_is_stripped_and_extra_keys_are_ignored() -> None:
    text = wrap('[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1], "label": " red cup ", "s": 0.9}]')
    assert parse(text, IMAGE).labels == ["red cup"]


def test_box_corners_are_ordered() -> None:
    answer = parse(wrap(json.dumps([obj([420, 839, 42, 84], [100, 200])])), IMAGE)
    assert answer.objects[0].box == (50, 50, 500, 499)


def test_coordinates_are_clamped_to_the_image() -> None:
    answer = parse(wrap(json.dumps([obj([-30, -5, 2000, 900], [-10, 5000])])), IMAGE)
    assert answer.objects[0].box == (0, 0, 999, 499)
    assert answer.objects[0].point == (0, 499)


def test_a_point_outside_its_box_is_kept() -> None:
    answer = parse(wrap(json.dumps([obj([0, 0, 84, 84], [420, 420])])), IMAGE)
    assert answer.objects[0].point == (500, 250)


def test_exactly_max_objects_is_allowed() -> None:
    items = [obj([0, 0, 84, 84], [1, 1]) for _ in range(MAX_OBJECTS)]
    assert len(parse(wrap(json.dumps(items)), IMAGE).objects) == MAX_OBJECTS


# --- the reference repairs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "labels"),
    [
        # [x, y}}]: the point array closed by "}}" instead of "]}"
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200}}]', [""]),
        # [x, y}]: the point array's "]" missing
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200}]', [""]),
        # }}]: one closing brace too many at the end
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200], "label": "knife"}}]', ["knife"]),
        # the same endings between objects and with whitespace
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200} , '
         '{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200 } } ]', ["", ""]),
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200], "label": "a"}},'
         '{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200], "label": "b"}}]', ["a", "b"]),
        # a repair elsewhere leaves labels that look like malformed endings as they are
        ('[{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200], "label": "size 2}"}},'
         '{"bbox_2d": [42, 84, 420, 839], "point_2d": [100, 200], "label": "say \\"3}}]\\""}}]',
         ["size 2}", 'say "3}}]"']),
    ],
)
def test_reference_repairs(answer: str, labels: list[str]) -> None:
    parsed = parse(wrap(answer), IMAGE)
    assert parsed.repaired is True
    assert parsed.labels == labels
    assert all(o.box == (50, 50, 500, 499) and o.point == (119, 119) for o in parsed.objects)


def test_valid_json_is_never_rewritten() -> None:
    # A label that looks like a malformed ending must survive untouched.
    text = wrap(json.dumps([obj([0, 0, 84, 84], [1, 1], "size 3}}]")]))
    parsed = parse(text, IMAGE)
    assert parsed.labels == ["size 3}}]"] and parsed.repaired is False


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<think>no answer</think>",
        '[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1]}]',
        "<answer>[]",
        "[]</answer>",
        "<answer>[]</answer> </think>",
    ],
)
def test_missing_answer_tags(text: str) -> None:
    expect_failure(text, "missing_answer")


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "none",
        "[{",
        '[{"bbox_2d": [0, 0, 84, 84], "point_2d": [1, 1]}',  # truncated: not a reference repair
        "```json\n[]\n```",
        "[" * 100_000,
    ],
)
def test_invalid_json(answer: str) -> None:
    expect_failure(wrap(answer), "invalid_json")


@pytest.mark.parametrize("answer", ["42", '"text"', "null", "true", "[1, 2]", '[{}, "x"]', "[[]]"])
def test_wrong_structure(answer: str) -> None:
    expect_failure(wrap(answer), "bad_structure")


def test_empty_object_mixed_with_real_ones() -> None:
    expect_failure(wrap(json.dumps([{}, obj([0, 0, 84, 84], [1, 1])])), "mixed_empty")


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"point_2d": [1, 1]}, "missing_key"),
        ({"bbox_2d": [0, 0, 84, 84]}, "missing_key"),
        (obj([0, 0, 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, 84, 84, 5], [1, 1]), "bad_bbox"),
        (obj("0, 0, 84, 84", [1, 1]), "bad_bbox"),
        (obj({"x1": 0}, [1, 1]), "bad_bbox"),
        (obj([[0, 0], [84, 84]], [1, 1]), "bad_bbox"),
        (obj([0, 0, "84px", 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, "", 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, "1_0", 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, None, 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, True, 84], [1, 1]), "bad_bbox"),
        (obj([0, 0, 84, 84], [1]), "bad_point"),
        (obj([0, 0, 84, 84], [1, 2, 3]), "bad_point"),
        (obj([0, 0, 84, 84], [False, 1]), "bad_point"),
        (obj([0, 0, 84, 84], ["nan", 1]), "bad_point"),
        (obj([0, 0, 84, 84], None), "bad_point"),
        (obj([0, 0, 84, 84], [1, 1], None), "bad_label"),
        (obj([0, 0, 84, 84], [1, 1], 3), "bad_label"),
        (obj([0, 0, 84, 84], [1, 1], ["knife"]), "bad_label"),
    ],
)
def test_wrong_types(item: dict, reason: str) -> None:
    error = expect_failure(wrap(json.dumps([obj([0, 0, 84, 84], [1, 1]), item])), reason)
    assert "object 1" in str(error)


@pytest.mark.parametrize(
    "answer",
    [
        '[{"bbox_2d": [NaN, 0, 84, 84], "point_2d": [1, 1]}]',
        '[{"bbox_2d": [0, 0, Infinity, 84], "point_2d": [1, 1]}]',
        '[{"bbox_2d": [0, 0, 84, 84], "point_2d": [-Infinity, 1]}]',
        '[{"bbox_2d": [0, 0, 1e400, 84], "point_2d": [1, 1]}]',
        '[{"bbox_2d": [0, 0, "1e400", 84], "point_2d": [1, 1]}]',
        '[{"bbox_2d": [0, 0, ' + "9" * 400 + ', 84], "point_2d": [1, 1]}]',
    ],
)
def test_nan_and_inf(answer: str) -> None:
    expect_failure(wrap(answer), "non_finite")


@pytest.mark.parametrize(
    ("box", "image_size"),
    [
        ([100, 0, 100, 84], IMAGE),  # zero width as answered
        ([0, 100, 84, 100], IMAGE),  # zero height as answered
        ([100, 0, 100.3, 84], IMAGE),  # 119.05 and 119.40: distinct answered, one pixel here
        ([10, 0, 11, 84], (100, 100)),  # 10 -> 1.19 -> 1, 11 -> 1.31 -> 1
        ([900, 0, 1000, 84], IMAGE),  # entirely right of the image: clamped to x = 999
        ([-50, 0, -10, 84], IMAGE),  # entirely left: clamped to x = 0
    ],
)
def test_degenerate_boxes(box: list, image_size: tuple[int, int]) -> None:
    expect_failure(wrap(json.dumps([obj(box, [1, 1])])), "degenerate_box", image_size)


def test_more_than_max_objects() -> None:
    items = [obj([0, 0, 84, 84], [1, 1]) for _ in range(MAX_OBJECTS + 1)]
    error = expect_failure(wrap(json.dumps(items)), "too_many_objects")
    assert str(MAX_OBJECTS) in str(error)


@pytest.mark.parametrize("text", [None, b"<answer>[]</answer>", 42, ["<answer>[]</answer>"]])
def test_non_string_input(text: object) -> None:
    expect_failure(text, "not_text")


def test_error_messages_name_the_problem_and_stay_short() -> None:
    error = expect_failure(wrap(json.dumps([obj(list(range(1000)), [1, 1])])), "bad_bbox")
    assert "'bbox_2d'" in str(error) and "4 numbers" in str(error)
    assert len(str(error)) < 200


def test_parse_error_is_a_star_edge_error_and_pickles() -> None:
    error = expect_failure(wrap("[{"), "invalid_json")
    assert isinstance(error, StarEdgeError)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason == "invalid_json" and str(copy) == str(error)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": (0, 10)}, "image_size"),
        ({"image_size": (10, 10), "input_size": (840,)}, "input_size"),
        ({"image_size": (10, 10), "frame": "normalised"}, "frame"),
    ],
)
def test_bad_arguments_are_the_callers_error(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse(wrap("[]"), **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        parse_safely(wrap("[]"), **kwargs)


# --- parse_safely --------------------------------------------------------------------------------


def test_parse_safely_returns_the_answer_or_the_error() -> None:
    good = parse_safely(wrap("[]"), IMAGE)
    bad = parse_safely("no tags", IMAGE, frame="grid1000")
    assert isinstance(good, Answer) and good.objects == []
    assert isinstance(bad, ParseError) and bad.reason == "missing_answer"


# --- properties ----------------------------------------------------------------------------------

image_sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))
input_sizes = st.sampled_from([(840, 840), (224, 224), (1000, 1000), (448, 336)])


@st.composite
def answer_objects(draw: st.DrawFn, input_size: tuple[int, int]) -> tuple[list, list, str]:
    """One object in the reasoner input frame: box, point (ints or floats) and a label."""
    w, h = input_size
    coordinate_x = st.one_of(st.integers(-20, w + 20), st.floats(-20, w + 20))
    coordinate_y = st.one_of(st.integers(-20, h + 20), st.floats(-20, h + 20))
    box = [draw(coordinate_x), draw(coordinate_y), draw(coordinate_x), draw(coordinate_y)]
    point = [draw(coordinate_x), draw(coordinate_y)]
    label = draw(st.text(max_size=12))
    return box, point, label


def expected_object(
    box: list, point: list, label: str, image_size: tuple[int, int], input_size: tuple[int, int]
) -> AnswerObject | None:
    """The reference result, written out in plain Python; None for a degenerate box."""
    (width, height), (w, h) = image_size, input_size

    def to_x(v: float) -> int:
        return min(max(reference_to_original(v, width, w), 0), width - 1)

    def to_y(v: float) -> int:
        return min(max(reference_to_original(v, height, h), 0), height - 1)

    x1, x2 = sorted([to_x(box[0]), to_x(box[2])])
    y1, y2 = sorted([to_y(box[1]), to_y(box[3])])
    if x1 == x2 or y1 == y2:
        return None
    return AnswerObject((x1, y1, x2, y2), (to_x(point[0]), to_y(point[1])), label.strip())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), image_size=image_sizes, input_size=input_sizes,
       quote=st.booleans(), think=st.text(alphabet="abc .<>/", max_size=30))
def test_valid_answers_round_trip_to_reference_coordinates(
    data: st.DataObject, image_size: tuple[int, int], input_size: tuple[int, int],
    quote: bool, think: str,
) -> None:
    objects = data.draw(st.lists(answer_objects(input_size), min_size=1, max_size=5))
    items = [
        obj([repr(v) if quote else v for v in box], [repr(v) if quote else v for v in point], label)
        for box, point, label in objects
    ]
    text = f"<think>{think}</think><answer>{json.dumps(items)}</answer>"
    expected = [expected_object(*o, image_size, input_size) for o in objects]
    result = parse_safely(text, image_size, input_size)
    if any(e is None for e in expected):
        assert isinstance(result, ParseError) and result.reason == "degenerate_box"
    else:
        assert isinstance(result, Answer), str(result)
        assert result.objects == expected


@settings(max_examples=200, deadline=None)
@given(image_size=image_sizes, data=st.data())
def test_grid1000_answers_round_trip_to_reference_coordinates(
    image_size: tuple[int, int], data: st.DataObject
) -> None:
    box, point, label = data.draw(answer_objects((1000, 1000)))
    text = wrap(json.dumps([obj(box, point, label)]))
    expected = expected_object(box, point, label, image_size, (1000, 1000))
    result = parse_safely(text, image_size, frame="grid1000")
    if expected is None:
        assert isinstance(result, ParseError) and result.reason == "degenerate_box"
    else:
        assert isinstance(result, Answer) and result.objects == [expected]


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
    st.sampled_from(["12", " 3.5 ", "nan", "1e999", "-0"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.sampled_from(["bbox_2d", "point_2d", "label", "x"]), children,
                        max_size=4),
    ),
    max_leaves=20,
)
json_ish_text = st.text(alphabet='[]{}",:0123456789.-eE truNaIfy bbox_2dpointlabel}', max_size=120)


def assert_only_parse_errors(text: object, image_size: tuple[int, int], frame: str) -> None:
    try:
        parse(text, image_size, frame=frame)
    except ParseError:
        pass


fuzz_inputs = st.one_of(
    st.text(max_size=200),
    json_ish_text.map(wrap),
    json_values.map(lambda v: wrap(json.dumps(v))),
    st.lists(st.fixed_dictionaries({"bbox_2d": json_values, "point_2d": json_values},
                                   optional={"label": json_values}), max_size=3)
    .map(lambda v: wrap(json.dumps(v))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fuzz_inputs, image_size=image_sizes, frame=st.sampled_from(["pixels", "grid1000"]))
def test_arbitrary_text_raises_only_parse_error(
    text: str, image_size: tuple[int, int], frame: str
) -> None:
    assert_only_parse_errors(text, image_size, frame)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=fuzz_inputs, image_size=image_sizes, frame=st.sampled_from(["pixels", "grid1000"]))
def test_arbitrary_text_raises_only_parse_error_10k(
    text: str, image_size: tuple[int, int], frame: str
) -> None:
    assert_only_parse_errors(text, image_size, frame)
