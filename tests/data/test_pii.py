"""PII masking: each type in English and Chinese, checksums, no false positives, the step."""

from __future__ import annotations

import pickle

import pytest

from pagoda.data.pii import PiiConfig, luhn_ok, mask_pii, pii_step, validate_cn_id
from pagoda.data.record import Record
from pagoda.errors import ConfigError


def with_cn_id_check(first17: str) -> str:
    """An 18-character ID number: `first17` and its ISO 7064 MOD 11-2 check character."""
    total = sum(int(digit) * (2 ** (17 - i) % 11) for i, digit in enumerate(first17))
    check = (12 - total % 11) % 11
    return first17 + ("X" if check == 10 else str(check))


def with_luhn_check(prefix: str) -> str:
    """`prefix` and the digit that makes it pass the Luhn check."""
    total = 0
    for i, char in enumerate(reversed(prefix)):  # the check digit will sit to the right
        value = int(char) * (2 if i % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return prefix + str(-total % 10)


CN_ID = with_cn_id_check("11010519491231002")  # born 1949-12-31
CN_ID_DIGIT = with_cn_id_check("44030419850719123")  # check character 0
CARD_19 = with_luhn_check("622202000000000000")  # UnionPay, 19 digits
CARD_19_GROUPED = " ".join(CARD_19[i:i + 4] for i in range(0, 19, 4))  # 4-4-4-4-3


def test_helpers_build_valid_numbers():
    assert CN_ID == "11010519491231002X"  # the well-known sample number
    assert CN_ID_DIGIT[-1] == "0" and CARD_19_GROUPED.count(" ") == 4
    assert with_luhn_check("411111111111111") == "4111111111111111"


def test_validate_cn_id():
    assert validate_cn_id(CN_ID) and validate_cn_id(CN_ID.lower()) and validate_cn_id(CN_ID_DIGIT)
    assert not validate_cn_id(CN_ID[:17] + "0") and not validate_cn_id(CN_ID_DIGIT[:17] + "X")
    assert not validate_cn_id(CN_ID_DIGIT[:17] + "1")
    assert not validate_cn_id(with_cn_id_check("11010519490230002"))  # 30 February
    assert not validate_cn_id(with_cn_id_check("11010519491301002"))  # month 13
    assert not validate_cn_id(with_cn_id_check("11010517001231002"))  # born 1700
    assert not validate_cn_id(CN_ID[:17]) and not validate_cn_id(CN_ID + "1")


def test_luhn_ok():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713") and luhn_ok(CARD_19)
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")
    assert not luhn_ok("4111 1111 1111 1111") and not luhn_ok("")


@pytest.mark.parametrize("text, expected", [
    # email
    ("Write to zhang.san@example.com.", "Write to [EMAIL]."),
    ("Contact: First.Last+news@mail.example.co.uk, thanks", "Contact: [EMAIL], thanks"),
    ("联系邮箱zhang.san@example.com。", "联系邮箱[EMAIL]。"),
    # phone
    ("Call +44 20 7946 0958 today.", "Call [PHONE] today."),
    ("Call +44 20 7946 0958 2024-05-01.", "Call [PHONE] 2024-05-01."),
    ("Call +1 (415) 555-2671, or +33 1 23 45 67 89.", "Call [PHONE], or [PHONE]."),
    ("Mobile 13812345678 or 138-1234-5678 or 138 1234 5678.",
     "Mobile [PHONE] or [PHONE] or [PHONE]."),
    ("联系电话13812345678，手机+86 139 1234 5678。", "联系电话[PHONE]，手机[PHONE]。"),
    ("电话：86-15912345678；备用+8618612345678", "电话：[PHONE]；备用[PHONE]"),
    # cn_id
    (f"ID number {CN_ID}, issued 2005.", "ID number [CN_ID], issued 2005."),
    (f"身份证号{CN_ID_DIGIT}，户籍北京。", "身份证号[CN_ID]，户籍北京。"),
    (f"身份证：{CN_ID.lower()}。", "身份证：[CN_ID]。"),
    # bank_card
    ("Card 4111 1111 1111 1111 expires 12/26.", "Card [BANK_CARD] expires 12/26."),
    ("Cards 4111-1111-1111-1111 and 4111111111111111.", "Cards [BANK_CARD] and [BANK_CARD]."),
    (f"银行卡号{CARD_19}，开户行北京。", "银行卡号[BANK_CARD]，开户行北京。"),
    (f"卡号：{CARD_19_GROUPED}。", "卡号：[BANK_CARD]。"),
    ("In 2024 4111 1111 1111 1111 was used.", "In 2024 [BANK_CARD] was used."),
    ("Card 4111 1111 1111 1111 5 times", "Card [BANK_CARD] 5 times"),
    # ip
    ("Server 192.168.1.1 and 8.8.8.8.", "Server [IP] and [IP]."),
    ("Open http://10.0.0.1:8080/ now", "Open http://[IP]:8080/ now"),
    ("IPv6 2001:db8::8a2e:370:7334, ::1 and fe80::1.", "IPv6 [IP], [IP] and [IP]."),
    ("Full 2001:0db8:85a3:0000:0000:8a2e:0370:7334 and ::ffff:192.0.2.1",
     "Full [IP] and [IP]"),
    ("服务器IP地址为192.168.0.100，端口80。", "服务器IP地址为[IP]，端口80。"),
    ("本机地址是::1.", "本机地址是[IP]."),
    ("Build 1.2.3.4 is a valid dotted quad.", "Build [IP] is a valid dotted quad."),
])
def test_masks_each_type(text, expected):
    assert mask_pii(text)[0] == expected


NO_PII = [
    "The company was founded in 2024 and grew 12% a year.",
    "Revenue rose to 12,500.00 dollars, about 1,234,567 yen.",
    "The meeting is on 2024-03-15 at 12:30:45, room 101.",
    "Order #20240315001 and invoice INV-2024-000123 have shipped.",
    "Upgrade to v1.2.3 or 1.2.3 today; v1.2.3.4 is old.",
    "Python 3.11.7 and Windows 10.0.19041.1 were released.",
    "The number 12345678901 is eleven digits but no mobile.",
    "Tracking code 1234567812345678 fails the Luhn check.",
    "Serial 0000 0000 0000 0000 passes Luhn but starts with 0.",
    "A 20-digit run 94111111111111111119 holds a card number, so does 94111111111111111.",
    f"A longer run 9{CN_ID_DIGIT} holds an ID number.",
    "Run 913812345678 holds a mobile number, so does 138123456789.",
    "A time 12:30, a ratio 3:2:1 and a scale of 1:100000.",
    "Temperature +3.5 degrees, up 2.5%, at 39.9042, 116.4074.",
    "ISBN 978-7-111-12345-6, pages 300-400, scores 21-18.",
    "Timestamp 1710489600 in seconds since 1970.",
    "C++ code: std::vector, a::b and the :: operator.",
    "MAC 00:1A:2B:3C:4D:5E and 256.1.1.1 and 999.999.999.999",
    "Prices were $1,299 and ¥38000 in the years 1998-2001.",
    "Dial +1 23 for help, then press 5.",
    "今天是2024年3月15日，天气很好。",
    "本次会议预算为¥38000元，参会人数1,234,567人。",
    "发票号码：No.12345678，金额12,500.00元。",
    "会议将于12:30:45开始，持续2小时，时间2024-03-15 08:00:00。",
    "我们使用1.2.3版本，不是v1.2.3.4。",
    "数字12345678901不是手机号，10086是客服。",
    "一串数字913812345678不是手机号。",
    "身份证号110105194912310021格式对但校验位错。",
    "他出生于1990年，今年34岁，住在3号楼1201室。",
    "第3章第15节，共200页，增长率为3.5%。",
    "股票代码600519，收盘价1688.00元，成交量12,345手。",
    "邮政编码100080，电话区号010，共有86个国家和1380个城市。",
    "比分是3:1，用时1:23:45。",
    "卡号6222 0200 0000 0000 001不能通过校验。",
    "号码１4111111111111111的前面是全角数字。",
    "Ordinary English prose with no numbers at all, and a colon: here.",
    "没有任何数字的中文句子，只有标点：逗号、句号。",
]


@pytest.mark.parametrize("text", NO_PII)
def test_ordinary_numbers_are_left_alone(text):
    assert mask_pii(text) == (text, {})


def test_invalid_checksums_are_not_masked():
    bad_id = CN_ID[:17] + "1"
    assert mask_pii(f"身份证{bad_id}。") == (f"身份证{bad_id}。", {})
    bad_card = "4111 1111 1111 1112"
    assert mask_pii(f"Card {bad_card}.") == (f"Card {bad_card}.", {})
    assert mask_pii(f"身份证{CN_ID}。") == ("身份证[CN_ID]。", {"cn_id": 1})


def test_counts_report_only_the_types_found():
    text = "a@example.com, b@example.org, 13812345678, 4111111111111111, 10.0.0.1"
    masked, counts = mask_pii(text)
    assert masked == "[EMAIL], [EMAIL], [PHONE], [BANK_CARD], [IP]"
    assert counts == {"email": 2, "bank_card": 1, "phone": 1, "ip": 1}
    assert mask_pii("电话13812345678和13912345678")[1] == {"phone": 2}


def test_earlier_type_wins_and_placeholders_never_nest():
    assert mask_pii("QQ邮箱13812345678@qq.com") == ("QQ邮箱[EMAIL]", {"email": 1})
    assert mask_pii(f"{CN_ID}") == ("[CN_ID]", {"cn_id": 1})
    only_phones = PiiConfig(types=("phone",))
    assert mask_pii(f"ID {CN_ID}", only_phones) == (f"ID {CN_ID}", {})  # no phone inside an ID
    digits_template = PiiConfig(placeholder="<{type} 13812345678 a@b.cn 4111111111111111>")
    assert mask_pii("x@example.com")[0].count("[") == 1
    assert mask_pii("x@example.com", digits_template) == (
        "<email 13812345678 a@b.cn 4111111111111111>", {"email": 1})


def test_found_anywhere_among_other_numbers():
    """Matches are searched only near digit runs and `@`s: far into long text, next to numbers."""
    filler = "In 2024 sales rose 3.5% to 12,500.00 by 12:30; see 1.2.3 and 1:2. " * 40
    for pii, placeholder in [("+44 20 7946 0958", "[PHONE]"), (CN_ID, "[CN_ID]"),
                             (CARD_19_GROUPED, "[BANK_CARD]"), ("fe80::1", "[IP]"),
                             ("192.168.1.1", "[IP]"), ("a.b@example.com", "[EMAIL]")]:
        masked, counts = mask_pii(filler + pii + " 2024 " + filler)
        assert masked == filler + placeholder + " 2024 " + filler and sum(counts.values()) == 1


def test_placeholder_template_and_type_selection():
    text = "Mail a@example.com or call 13812345678."
    assert mask_pii(text, PiiConfig(placeholder="<{type}>"))[0] == "Mail <email> or call <phone>."
    assert mask_pii(text, PiiConfig(placeholder="{TYPE}"))[0] == "Mail EMAIL or call PHONE."
    assert mask_pii(text, PiiConfig(types=("email",))) == (
        "Mail [EMAIL] or call 13812345678.", {"email": 1})
    assert mask_pii(text, PiiConfig(types=())) == (text, {})


def test_config_errors():
    with pytest.raises(ConfigError, match="'phones'.*email, cn_id, bank_card, phone, ip"):
        PiiConfig(types=("email", "phones"))
    with pytest.raises(ConfigError, match="placeholder"):
        PiiConfig(placeholder="[{kind}]")


def test_step_masks_records_and_records_lineage():
    step = pii_step()
    record = Record("电话13812345678，邮箱a@example.com", "x.jsonl:3", {"lang": "zh"}, ("normalize",))
    masked = step(record)
    assert masked.text == "电话[PHONE]，邮箱[EMAIL]"
    assert masked.steps == ("normalize", "pii") and masked.source == "x.jsonl:3"
    assert masked.meta == {"lang": "zh", "pii": {"email": 1, "phone": 1}}
    assert record.text.startswith("电话138")  # the input is untouched
    clean = step(Record("nothing here", "y.txt"))
    assert clean == Record("nothing here", "y.txt", {}, ("pii",))  # no "pii" meta when clean


def test_step_pickles_for_worker_processes():
    step = pii_step(PiiConfig(types=("phone",), placeholder="<{type}>"))
    restored = pickle.loads(pickle.dumps(step))
    record = Record("call 13812345678 or a@example.com", "z.txt")
    assert restored(record) == step(record)
    assert restored(record).text == "call <phone> or a@example.com"
